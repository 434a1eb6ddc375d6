"""Widgets of the Fine-tune page: loss chart, dataset preview, settings form, results."""
