"""Thin Airflow operators, sensors, triggers and hooks over include/."""
