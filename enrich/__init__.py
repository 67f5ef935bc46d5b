"""enrich: decode GitLab audit events, flatten them into gitlab.* fields, geolocate, write them on."""
