"""Adapters: the ports implemented over real services (Azure Tables/Queues, EHR, Entra, Graph)."""
