"""A reward a tiny random model can learn in a few GRPO steps on CPU (loaded through reward.kind=callable)."""


def letter_e_fraction(response: str, example) -> float:
    """Fraction of the response's characters that are the letter 'e' (0 for an empty response)."""
    return response.count("e") / len(response) if response else 0.0
