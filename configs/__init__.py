"""The paper's configs and the original CompVis model yamls, shipped as package data (``ld3.configs``)."""
