"""Tests of infra/: Bicep templates, parameter files and the infra-check runner."""
