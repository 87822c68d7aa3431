"""Thin HTTP triggers, one ``func.Blueprint`` per area. They translate, nothing more."""
