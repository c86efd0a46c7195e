"""What tests and benchmarks check Loupe against: brute-force oracles and real sample pictures.
"""


from .oracles import brute_force_pairs, exact_search
from .samples import fashion_mnist, skimage_photos, tuxpaint_stamps

__all__ = ["exact_search", "brute_force_pairs", "tuxpaint_stamps", "skimage_photos", "fashion_mnist"]
