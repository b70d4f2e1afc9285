"""Data: the bundled sample image, synthetic nucleus images with known truth, public labelled
sets. The sample files sit beside these modules.
"""
