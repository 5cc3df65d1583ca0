"""The one-machine stack, not the library: starting and stopping the model server, Prometheus
and Airflow on loopback (``processes``), Airflow's REST API for scripts and benches
(``airflow_api``), and the load generator (``loadgen``). Tests, ``scripts/`` and ``bench/``
use it; nothing in ``vision_rollout``, ``model_server``, ``plugins/`` or ``dags/`` imports it.
"""
