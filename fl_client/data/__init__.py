"""One bank's text data (being split into modules; see synthetic.py for now)."""

from fl_client.data.synthetic import *  # noqa: F403
from fl_client.data.synthetic import _check_text, _customer_ids  # noqa: F401
