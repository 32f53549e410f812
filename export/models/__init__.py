"""The family, one module per member (or per close pair); importing registers them all."""

# Import order is registration order, which list_models() reports: the article's models first,
# then the CNNs by year. isort would make it alphabetical, so it is kept out.
# isort: off
from export.models import (  # noqa: F401  (imported for their @register_model side effects)
    linear,
    kirsch,
    cnn,
    lenet,
    alexnet,
    vgg,
    googlenet,
    resnet,
    inception_resnet,
)

# isort: on
