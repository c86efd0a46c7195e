"""Search by region: a box of the query (``box``), the query's proposed object regions (``regions``), and
the region index (``loupe index --regions``: a few regions of every indexed picture, so a small object
finds the picture that contains it). See docs/regions.md."""

from retrieval.regions.box import check_box_in_image, crop_to_box, parse_box
from retrieval.regions.proposals import Region, propose_regions
from retrieval.regions.search import RegionHit, RegionResult, RegionSearch, search_regions
from retrieval.regions.store import RegionSet, build_region_index, open_region_sets

__all__ = ["Region", "RegionHit", "RegionResult", "RegionSearch", "RegionSet", "build_region_index",
           "check_box_in_image", "crop_to_box", "open_region_sets", "parse_box", "propose_regions",
           "search_regions"]
