"""Figures (plotly): builders for every picture the notebooks show, and the store that saves them."""
