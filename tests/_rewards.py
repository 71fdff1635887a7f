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
