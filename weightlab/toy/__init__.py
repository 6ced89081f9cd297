"""AnimateLCM at toy scale: labelled synthetic data (:mod:`.data`), a classifier-based evaluator with toy FID/FVD
and prompt accuracy (:mod:`.evaluate`), and the script that reproduces the paper's experiments from seeds
(``python -m weightlab.toy.reproduce --out DIR``, :mod:`.reproduce`)."""
