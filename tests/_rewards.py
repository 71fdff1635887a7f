"""Reward callables for trainer tests (loaded through reward.kind=callable)."""


def never_correct(response: str, example) -> bool:
    return False


KILL_AT_CALL_ENV = "OPSD_TEST_KILL_AT_REWARD_CALL"
_calls = 0


def kill_at_call(response: str, example) -> float:
    """1.0 when the response contains the example's answer; SIGKILLs this process (kill -9: no handler, no
    cleanup) at call number ``$OPSD_TEST_KILL_AT_REWARD_CALL`` when set: a crash at a known point of a step."""
    import os
    import signal

    global _calls
    _calls += 1
    if os.environ.get(KILL_AT_CALL_ENV) == str(_calls):
        os.kill(os.getpid(), signal.SIGKILL)
    return float(bool(example.answer) and example.answer in response)


PAUSE_AT_CALL_ENV = "OPSD_TEST_PAUSE_AT_REWARD_CALL"
PAUSE_DIR_ENV = "OPSD_TEST_PAUSE_DIR"


def pause_at_call(response: str, example) -> float:
    """As ``kill_at_call``, but at call ``$OPSD_TEST_PAUSE_AT_REWARD_CALL`` this process writes ``paused`` into
    ``$OPSD_TEST_PAUSE_DIR`` and waits (at most 120 s) until the test writes ``go`` there: a fault injected from
    outside at a known point of a step (rank 0 grading, the other ranks waiting for the rollouts)."""
    import os
    import time
    from pathlib import Path

    global _calls
    _calls += 1
    if os.environ.get(PAUSE_AT_CALL_ENV) == str(_calls):
        folder = Path(os.environ[PAUSE_DIR_ENV])
        (folder / "paused").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return float(bool(example.answer) and example.answer in response)
