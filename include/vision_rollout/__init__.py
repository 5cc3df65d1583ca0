"""Spec, metrics sources, gates, mesh routers, shadow audit and Slack reports."""
