"""The HTTP faces beside the prediction routes: `review` (under `/review`, the review page
included) and `admin` (under `/admin`); `v2` holds the Open Inference Protocol's messages as pure
functions (its routes are in `app.py`). Each route parses, checks the caller, calls a function of
`feedback/` or `models/`, and shapes the answer."""
