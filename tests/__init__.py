import os

# openapi-spec-validator validates with jsonschema-rs whenever that is installed (schemathesis
# brings it), and its regex engine refuses patterns of PayPal's published description that
# Python's accepts (the email pattern): the fakes check the vendors' descriptions with the
# Python backend, as they did before.
os.environ.setdefault("OPENAPI_SPEC_VALIDATOR_SCHEMA_VALIDATOR_BACKEND", "jsonschema")
