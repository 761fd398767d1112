"""Lesion Lab core: data, models, training, evaluation and explanations for HAM10000.

This package never imports streamlit; the dashboard in ``pages/`` is a thin view over it.
"""
