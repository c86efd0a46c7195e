"""Attribution: which regions of a result made it match a query (Grad-CAM, Eigen-CAM, token
contributions, integrated gradients, occlusion), and the overlays drawn from them (legend, pair view).
"""


from .attribution import METHODS, attribute, explain
from .overlay import overlay_png
from .pair import pair_png

__all__ = ["explain", "attribute", "METHODS", "overlay_png", "pair_png"]
