"""FedFusion's core, shared by coordinator and hospitals: configuration, the message protocol,
the run folder and its views (`views`), errors, deployment credentials (`certs`), and the packages
model, data, training and privacy. It imports neither Flower nor the coordinator, hospital,
simulation or tool packages (tests/test_architecture.py)."""
