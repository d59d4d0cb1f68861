"""What the notebooks show: plotly figure builders and the store that saves and displays them (`figures`),
widget explorers (`explorer`) and tables (`tables`)."""
