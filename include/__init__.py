"""The rollout library: pure logic with no Airflow imports."""
