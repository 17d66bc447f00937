"""spade_ray: SPADE visual anomaly detection and segmentation, in process or as a Ray job.

>>> from spade_ray import Spade
>>> model = Spade("lite0").fit(normal_image_paths)          # doctest: +SKIP
>>> prediction = model.predict(images_to_inspect)          # doctest: +SKIP
"""

from spade_ray.model import Calibration, Prediction, Spade, SpadeConfig

__all__ = ["Calibration", "Prediction", "Spade", "SpadeConfig", "__version__"]
__version__ = "0.1.0"
