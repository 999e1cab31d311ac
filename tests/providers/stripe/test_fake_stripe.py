"""The fake itself: it must refuse what Stripe refuses, or the provider tests prove nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import assert_no_violations
from tests.fakes import stripe_spec
from tests.fakes.stripe_server import FakeStripe
from tests.fakes.stripe_spec import StripeSpec, coerce, decode_brackets, specs_dir
from tests.providers.stripe.conftest import SECRET_KEY

AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def _post(fake: FakeStripe, path: str, body: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        return await client.post(path, content=body, headers={**AUTH, **FORM, **headers})


def _take_violations(fake: FakeStripe) -> list[str]:
    """The violations this test provoked on purpose, cleared so the fixture passes."""
    found = [v.problem for v in fake.violations]
    fake.violations.clear()
    return found


class TestSpecValidation:
    async def test_an_unknown_parameter_is_a_violation(self, fake_stripe: FakeStripe) -> None:
        response = await _post(
            fake_stripe, "/v1/payment_intents", "amount=1900&currency=eur&colour=blue"
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.headers["Request-Id"].startswith("req_")
        (problem,) = _take_violations(fake_stripe)
        assert "colour" in problem
        assert fake_stripe.payment_intents == {}

    async def test_an_unknown_nested_parameter_is_a_violation(
        self, fake_stripe: FakeStripe
    ) -> None:
        body = (
            "mode=payment&success_url=https://a.example&cancel_url=https://b.example"
            "&line_items[0][quantity]=1&line_items[0][price_data][currency]=eur"
            "&line_items[0][price_data][unit_amount]=100"
            "&line_items[0][price_data][product_data][name]=X"
            "&line_items[0][price_data][product_data][colour]=blue"
        )
        response = await _post(fake_stripe, "/v1/checkout/sessions", body)
        assert response.status_code == 400
        (problem,) = _take_violations(fake_stripe)
        assert "colour" in problem

    async def test_a_wrong_type_is_a_violation(self, fake_stripe: FakeStripe) -> None:
        response = await _post(fake_stripe, "/v1/payment_intents", "amount=lots&currency=eur")
        assert response.status_code == 400
        (problem,) = _take_violations(fake_stripe)
        assert "lots" in problem

    async def test_a_missing_required_parameter_is_a_violation(
        self, fake_stripe: FakeStripe
    ) -> None:
        response = await _post(fake_stripe, "/v1/payment_intents", "amount=1900")
        assert response.status_code == 400
        (problem,) = _take_violations(fake_stripe)
        assert "currency" in problem

    async def test_an_unknown_query_parameter_is_a_violation(self, fake_stripe: FakeStripe) -> None:
        async with httpx.AsyncClient(base_url=fake_stripe.url) as client:
            response = await client.get("/v1/balance", params={"colour": "blue"}, headers=AUTH)
        assert response.status_code == 400
        (problem,) = _take_violations(fake_stripe)
        assert "colour" in problem

    async def test_an_unknown_path_is_a_violation(self, fake_stripe: FakeStripe) -> None:
        response = await _post(fake_stripe, "/v1/payment_intents/pi_1/teleport", "")
        assert response.status_code == 404
        assert _take_violations(fake_stripe) == ["unknown path"]

    async def test_a_test_that_leaves_a_violation_fails(self, fake_stripe: FakeStripe) -> None:
        await _post(fake_stripe, "/v1/payment_intents", "amount=1900&currency=eur&colour=blue")
        with pytest.raises(AssertionError, match="colour"):
            assert_no_violations(fake_stripe)  # what the fixture runs after each test
        _take_violations(fake_stripe)
        assert_no_violations(fake_stripe)


class TestWireFormat:
    async def test_a_wrong_key_gets_stripes_401(self, fake_stripe: FakeStripe) -> None:
        async with httpx.AsyncClient(base_url=fake_stripe.url) as client:
            wrong = await client.get("/v1/balance", headers={"Authorization": "Bearer sk_test_no"})
            missing = await client.get("/v1/balance")
        assert wrong.status_code == missing.status_code == 401
        assert wrong.json()["error"]["type"] == "invalid_request_error"
        assert "Request-Id" in wrong.headers

    async def test_idempotency_key_with_other_parameters_is_refused(
        self, fake_stripe: FakeStripe
    ) -> None:
        key = {"Idempotency-Key": "same-key"}
        first = await _post(fake_stripe, "/v1/payment_intents", "amount=1900&currency=eur", **key)
        replay = await _post(fake_stripe, "/v1/payment_intents", "amount=1900&currency=eur", **key)
        other = await _post(fake_stripe, "/v1/payment_intents", "amount=2900&currency=eur", **key)
        assert first.json() == replay.json()
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert other.status_code == 400
        assert other.json()["error"]["type"] == "idempotency_error"
        assert len(fake_stripe.payment_intents) == 1

    async def test_objects_follow_the_pinned_api_version(self, fake_stripe: FakeStripe) -> None:
        intent = (
            await _post(fake_stripe, "/v1/payment_intents", "amount=1900&currency=eur")
        ).json()
        assert "charges" not in intent  # removed in 2022-11-15
        assert intent["latest_charge"] is None
        assert intent["object"] == "payment_intent"
        assert intent["client_secret"].startswith(f"{intent['id']}_secret_")


class TestDecoding:
    def test_brackets_become_nested_objects(self) -> None:
        decoded = decode_brackets(
            [("a[b][0][c]", "1"), ("a[b][1][c]", "2"), ("expand[]", "x"), ("expand[]", "y")]
        )
        assert decoded == {
            "a": {"b": {"0": {"c": "1"}, "1": {"c": "2"}}},
            "expand": {"0": "x", "1": "y"},
        }

    def test_scalars_are_coerced_by_the_schema(self) -> None:
        schema = {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "ok": {"type": "boolean"},
                "items": {"type": "array", "items": {"type": "integer"}},
                "metadata": {
                    "anyOf": [
                        {"type": "object", "additionalProperties": {"type": "string"}},
                        {"type": "string", "enum": [""]},
                    ]
                },
            },
        }
        value = {"n": "12", "ok": "true", "items": {"1": "5", "0": "4"}, "metadata": ""}
        assert coerce(value, schema) == {"n": 12, "ok": True, "items": [4, 5], "metadata": ""}

    def test_the_allow_list_lets_a_named_parameter_through(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spec = StripeSpec.load()
        body = {"amount": 1900, "currency": "eur", "newer_param": "x"}
        assert spec.validate("POST", "/v1/payment_intents", {}, body)[3]
        monkeypatch.setattr(
            stripe_spec,
            "ALLOWED_UNDOCUMENTED",
            frozenset({("POST", "/v1/payment_intents", "newer_param")}),
        )
        assert spec.validate("POST", "/v1/payment_intents", {}, body)[3] == []

    def test_the_specs_directory_can_be_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("PAYMENT_SPECS_DIR", str(tmp_path))
        assert specs_dir() == tmp_path
        monkeypatch.delenv("PAYMENT_SPECS_DIR")
        assert (specs_dir() / "stripe" / "spec3.json").is_file()
