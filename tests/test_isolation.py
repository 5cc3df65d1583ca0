"""The suite's own isolation: what a test leaves in a process-wide state does not reach the tests
that run after it in the same worker (``make test`` runs each file's tests in one process)."""

from __future__ import annotations

import pytest

# Airflow's secrets masker, one per process in each of its two copies (the SDK's, which tasks and
# ``airflow.sdk.log.mask_secret`` use, and the core's): a connection read registers its password and
# its extras, a JSON string among them ('"models"': the namespace a report names was hidden after it)
MASKERS = ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker")
VALUE = "a-value-one-test-registered"


@pytest.mark.parametrize("module", MASKERS)
def test_a_test_registers_a_value_with_airflows_masker(module: str) -> None:
    import importlib

    masker = importlib.import_module(module)
    masker.mask_secret(VALUE)
    assert masker.redact(f"kubectl -n {VALUE} get pods") == "kubectl -n *** get pods"


@pytest.mark.parametrize("module", MASKERS)
def test_the_tests_after_it_in_the_process_find_the_value_unmasked(module: str) -> None:
    """(Run after the test above, as its file runs them.)"""
    import importlib

    masker = importlib.import_module(module)
    assert masker.redact(f"kubectl -n {VALUE} get pods") == f"kubectl -n {VALUE} get pods"
