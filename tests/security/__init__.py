"""Security tests (issue 8): forgery, redirects, injection, body limits, privacy."""
