"""Reward callables for trainer tests (loaded through reward.kind=callable)."""


def never_correct(response: str, example) -> bool:
    return False
