"""Evaluation metrics users compare with papers: language (nlg.py, pycocoevalcap's numbers),
clinical efficacy (clinical.py, every P/R/F1 flavour over CheXpert labels), grounding
(grounding.py: IoU/CNR/pointing game/Dice, MS-CXR; synthetic_grounding.py: the built-in data's
masks). Command line: ``python -m metrics``."""
