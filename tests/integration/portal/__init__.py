"""Portal API over real HTTP: the local host, Azurite, the sandbox EHR and Entra stand-in."""
