"""Thin Airflow operators, sensors, triggers and hooks over include/ (issue 5)."""
