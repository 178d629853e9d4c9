"""The hospital: the Flower ClientApp (`app`) and the plain code it calls: the site's own
configuration (`site_config`), what it keeps warm (`state`) and one round at a site (`rounds`)."""
