"""Instruction-conditioned retrieval ("this image, but in red"): instruction parsing, composed
query vectors and two-list fusion.
"""


from .compose import DEFAULT_METHOD, compose_query
from .fusion import fusion_search
from .instructions import parse_instruction

__all__ = ["parse_instruction", "compose_query", "DEFAULT_METHOD", "fusion_search"]
