"""The API's endpoints, one module per resource; each lists its ``ROUTES`` and the JSON
``BODIES`` its operations take."""
