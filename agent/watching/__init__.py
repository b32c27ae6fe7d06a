"""Pure building blocks of the node agent's watch loop: node selection and the work queue.

Nothing here talks to Kubernetes; inputs are the raw dicts the API returns.
"""
