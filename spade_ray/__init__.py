"""spade_ray: SPADE visual anomaly detection and segmentation, in process or as a Ray job.

>>> from spade_ray import Spade
>>> model = Spade("lite0").fit(normal_image_paths)          # doctest: +SKIP
>>> prediction = model.predict(images_to_inspect)          # doctest: +SKIP
"""

from spade_ray.method.calibration import Calibration
from spade_ray.method.config import SpadeConfig
from spade_ray.method.scorer import Prediction
from spade_ray.model import Spade

__all__ = ["Calibration", "Prediction", "Spade", "SpadeConfig", "__version__"]
# The one place the version is written: pyproject.toml reads it from here ([tool.setuptools.dynamic]),
# so the wheel's metadata, `spade-ray --version` and this attribute agree. A plain string literal:
# setuptools parses it without importing the package.
__version__ = "0.1.0"
