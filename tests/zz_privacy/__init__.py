"""Runs last (directory order): the whole-session privacy scan."""
