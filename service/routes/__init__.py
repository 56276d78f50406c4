"""The HTTP faces beside the prediction routes: a route module per resource. Each route parses,
checks the caller, calls one function of `feedback/` or `models/`, and shapes the answer."""
