"""The email outbox's decisions (service/notify/outbox.py, `EmailNotifier`): one email per recipient
for the keys of one alert, waiting for siblings still on their way, exactly once through the store's
reserve/finish, a row another sender holds, a sender that died mid-send, refusals and the security
contact. The real store; the SMTP relay is a double answering per envelope recipient.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from service.notify import EmailNotifier, Letter
from service.notify.outbox import OWNER, REFUSAL
from service.notify.smtp import SendOutcome, SendResult
from service.reasons import Reason
from service.store import DeliveryStatus, State
from service.tokens import redact
from tests.unit.pipeline_doubles import (
    START,
    Clock,
    FakeSmtp,
    drive,
    intake,
    key_fields,
    one,
    run_with_store,
    token,
)

SENDER = "leak-responder@example.test"
CONTACT = "security@example.test"
GROUP_WAIT = 10.0
HOLD = 30.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


def notifier_for(store, clock: Clock, smtp: FakeSmtp, contact: str | None = CONTACT) -> EmailNotifier:
    return EmailNotifier(store, smtp, Letter(SENDER, contact), group_wait=GROUP_WAIT, hold=HOLD, clock=clock)  # type: ignore[arg-type]


async def alert(
    store, clock: Clock, owners: dict[int, tuple[str, ...]], state: State = State.CONFIRMED, **fields
):
    """One alert's keys, each `n` owned by `owners[n]`, moved to `state`; their ids in order."""
    ids = await intake(store, *owners)
    for n, incident_id in zip(owners, ids, strict=True):
        if state is State.RECEIVED:
            continue
        extra: dict[str, Any] = {"revoked_at": START, **fields}
        if state is State.CONFIRMED:
            extra.setdefault("confirmed_at", START)
        if state is State.UNCONFIRMED:
            extra.setdefault("unconfirmed_at", START)
        await drive(store, incident_id, state, START + 3600.0, **key_fields(n, *owners[n]), **extra)
    return ids


def reasons_logged(caplog) -> list[str]:
    return [r.reason for r in caplog.records if r.name == "service.notify" and hasattr(r, "reason")]


# -- grouping --------------------------------------------------------------------------------------


def test_one_email_per_recipient_for_the_keys_of_one_alert(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(
            store,
            clock,
            {1: ("Ann@example.test",), 2: ("ann@example.test",), 3: ("bob@example.test", "ann@example.test")},
        )
        result = await notifier_for(store, clock, smtp).notify(await store.incidents(ids))
        return ids, result, await store.deliveries(ids)

    ids, result, rows = run_with_store(tmp_path, clock, scenario)
    assert sorted(r for r, _ in smtp.sent) == ["ann@example.test", "bob@example.test"]
    [to_ann] = smtp.to("ann@example.test")
    assert to_ann["Subject"] == "3 of your Supermemory API keys were leaked and have been revoked"
    [to_bob] = smtp.to("bob@example.test")
    assert to_bob["Subject"] == f"Your Supermemory API key {redact(token(3))} was leaked and has been revoked"
    assert result.done == set(ids) and not result.pending and not result.waiting and not result.unreachable
    assert {(d.incident_id, d.recipient, d.status) for d in rows} == {
        (ids[0], "ann@example.test", DeliveryStatus.SENT),
        (ids[1], "ann@example.test", DeliveryStatus.SENT),
        (ids[2], "ann@example.test", DeliveryStatus.SENT),
        (ids[2], "bob@example.test", DeliveryStatus.SENT),
    }
    # One message per recipient, recorded on each row it covered.
    assert len({d.message_id for d in rows if d.recipient == "ann@example.test"}) == 1


def test_a_ready_sibling_goes_in_the_same_email_and_its_turn_is_brought_forward(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        first, sibling = await alert(store, clock, {1: ("ann@example.test",), 2: ("ann@example.test",)})
        clock.advance(1.0)
        notifier = notifier_for(store, clock, smtp)
        told = await notifier.notify(await store.incidents([first]))
        woken = await one(store, sibling)
        # The sibling's own turn: it was told already, nothing goes out twice.
        at_its_turn = await notifier.notify([woken])
        return first, sibling, told, woken, at_its_turn

    first, sibling, told, woken, at_its_turn = run_with_store(tmp_path, clock, scenario)
    assert len(smtp.sent) == 1
    assert smtp.sent[0][1]["Subject"] == "2 of your Supermemory API keys were leaked and have been revoked"
    assert told.done == {first}, "only the claimed incident is the caller's to record"
    assert woken.next_run_at == START + 1.0, "scheduled at START + 3600, woken now"
    assert at_its_turn.done == {sibling}


def test_keys_of_another_alert_are_not_grouped(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        [a] = await alert(store, clock, {1: ("ann@example.test",)})
        [b] = await alert(store, clock, {2: ("ann@example.test",)})
        result = await notifier_for(store, clock, smtp).notify(await store.incidents([a]))
        return a, result, await one(store, b)

    a, result, other = run_with_store(tmp_path, clock, scenario)
    assert len(smtp.sent) == 1 and result.done == {a}
    assert other.next_run_at == START + 3600.0, "not woken: it gets its own email at its own turn"


def test_incidents_handed_over_together_go_to_a_recipient_in_one_email(tmp_path, clock):
    """Grouping is by recipient over the whole batch, not only over one alert's keys."""
    smtp = FakeSmtp()

    async def scenario(store):
        [a] = await alert(store, clock, {1: ("ann@example.test",)})
        [b] = await alert(store, clock, {2: ("ann@example.test", "bob@example.test")})
        return {a, b}, await notifier_for(store, clock, smtp).notify(await store.incidents([a, b]))

    ids, result = run_with_store(tmp_path, clock, scenario)
    assert sorted(r for r, _ in smtp.sent) == ["ann@example.test", "bob@example.test"]
    [to_ann] = smtp.to("ann@example.test")
    assert to_ann["Subject"] == "2 of your Supermemory API keys were leaked and have been revoked"
    assert result.done == ids


def test_a_confirmed_key_waits_for_siblings_that_may_share_its_recipient(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await intake(store, 1, 2, 3)
        await drive(
            store, ids[0], State.CONFIRMED, START, **key_fields(1, "ann@example.test"), confirmed_at=START
        )
        # Sibling 2 is not looked up yet (any recipient possible); sibling 3 is another owner's.
        await drive(store, ids[2], State.MATCHED, START, **key_fields(3, "bob@example.test"))
        notifier = notifier_for(store, clock, smtp)
        clock.now = START + GROUP_WAIT - 0.5
        waiting = await notifier.notify(await store.incidents([ids[0]]))
        # Once sibling 2 is matched to someone else, nothing is left to wait for.
        await drive(store, ids[1], State.MATCHED, START, **key_fields(2, "carol@example.test"))
        sent = await notifier.notify(await store.incidents([ids[0]]))
        return ids, waiting, sent

    ids, waiting, sent = run_with_store(tmp_path, clock, scenario)
    assert waiting.waiting == {ids[0]: START + GROUP_WAIT} and not waiting.done and not waiting.pending
    assert sent.done == {ids[0]} and [r for r, _ in smtp.sent] == ["ann@example.test"]


def test_a_sibling_in_flight_for_the_same_recipient_is_waited_for_then_not(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await intake(store, 1, 2)
        await drive(
            store, ids[0], State.CONFIRMED, START, **key_fields(1, "ann@example.test"), confirmed_at=START
        )
        await drive(
            store, ids[1], State.REVOKED, START, **key_fields(2, "ann@example.test"), revoked_at=START
        )
        notifier = notifier_for(store, clock, smtp)
        waiting = await notifier.notify(await store.incidents([ids[0]]))
        clock.now = START + GROUP_WAIT
        waited_enough = await notifier.notify(await store.incidents([ids[0]]))
        return ids, waiting, waited_enough

    ids, waiting, waited_enough = run_with_store(tmp_path, clock, scenario)
    assert waiting.waiting == {ids[0]: START + GROUP_WAIT}
    assert waited_enough.done == {ids[0]} and len(smtp.sent) == 1
    assert (
        smtp.sent[0][1]["Subject"]
        == f"Your Supermemory API key {redact(token(1))} was leaked and has been revoked"
    )


def test_an_unconfirmed_key_never_waits_and_its_email_is_urgent(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await intake(store, 1, 2)
        await drive(
            store, ids[0], State.UNCONFIRMED, START, **key_fields(1, "ann@example.test"), unconfirmed_at=START
        )
        return ids, await notifier_for(store, clock, smtp).notify(await store.incidents([ids[0]]))

    ids, result = run_with_store(tmp_path, clock, scenario)
    assert result.done == {ids[0]} and not result.waiting
    [(_, message)] = smtp.sent
    assert (
        message["Subject"].startswith("URGENT: rotate your Supermemory API key")
        and message["Importance"] == "high"
    )


def test_a_key_confirmed_before_its_urgent_email_could_go_gets_the_first_email_confirmed(tmp_path, clock):
    """SMTP refused the urgent email; a re-probe then confirmed the key. Its owner, told nothing yet,
    gets the first email with the confirmed wording, which settles that email's pending delivery;
    an owner already told urgently gets the follow-up, a delivery of its own."""
    smtp = FakeSmtp()
    smtp.answers["ann@example.test"] = SendResult(SendOutcome.RETRY, Reason.SMTP_UNAVAILABLE, "refused")

    async def scenario(store):
        ids = await intake(store, 1, 2)
        fields = {"unconfirmed_at": START, "revoked_at": START}
        await drive(store, ids[0], State.UNCONFIRMED, START, **key_fields(1, "ann@example.test"), **fields)
        await drive(store, ids[1], State.UNCONFIRMED, START, **key_fields(2, "bob@example.test"), **fields)
        notifier = notifier_for(store, clock, smtp)
        urgent = await notifier.notify(await store.incidents(ids))
        await drive(store, ids[1], State.UNCONFIRMED, START, notified_at=START)
        for incident_id in ids:
            await drive(store, incident_id, State.CONFIRMED, START, confirmed_at=START + 3600.0)
        del smtp.answers["ann@example.test"]
        confirmed = await notifier.notify(await store.incidents(ids))
        return ids, urgent, confirmed, await store.deliveries(ids)

    ids, urgent, confirmed, rows = run_with_store(tmp_path, clock, scenario)
    assert urgent.pending == {ids[0]: Reason.SMTP_UNAVAILABLE} and urgent.done == {ids[1]}
    assert confirmed.done == set(ids)
    assert sorted((r.recipient, r.purpose, r.status) for r in rows) == [
        ("ann@example.test", "owner", DeliveryStatus.SENT),
        ("bob@example.test", "owner", DeliveryStatus.SENT),
        ("bob@example.test", "owner_confirmed", DeliveryStatus.SENT),
    ]
    ann = smtp.to("ann@example.test")
    assert [m["Subject"] for m in ann][
        -1
    ] == f"Your Supermemory API key {redact(token(1))} was leaked and has been revoked"
    assert smtp.to("bob@example.test")[-1]["Subject"].endswith("is now confirmed revoked")


# -- exactly once ----------------------------------------------------------------------------------


def test_a_second_turn_sends_nothing_again(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",), 2: ("bob@example.test",)})
        notifier = notifier_for(store, clock, smtp)
        first = await notifier.notify(await store.incidents(ids))
        # Another replica (its own holder) runs the same turn again, after a lost write say.
        second = await notifier_for(store, clock, smtp).notify(await store.incidents(ids))
        return ids, first, second

    ids, first, second = run_with_store(tmp_path, clock, scenario)
    assert len(smtp.sent) == 2
    assert first.done == second.done == set(ids)


def test_a_row_held_by_a_sender_in_flight_is_left_to_it(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        smtp.gate, smtp.entered = asyncio.Event(), asyncio.Event()
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        batch = await store.incidents(ids)
        first = asyncio.create_task(notifier_for(store, clock, smtp).notify(batch))
        await smtp.entered.wait()  # the first sender holds the row and is handing the email over
        second = await notifier_for(store, clock, smtp).notify(batch)
        smtp.gate.set()
        return ids, await first, second

    ids, first, second = run_with_store(tmp_path, clock, scenario)
    assert len(smtp.sent) == 1
    assert first.done == set(ids)
    # The other sender neither sends nor counts the delivery as done: it looks again later.
    assert second.pending == {ids[0]: Reason.DELIVERY_HELD_ELSEWHERE} and not second.done


def test_a_row_another_sender_holds_is_left_to_it(tmp_path, clock, caplog):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        await store.reserve_deliveries("other-replica", "ann@example.test", OWNER, ids, HOLD)
        result = await notifier_for(store, clock, smtp).notify(await store.incidents(ids))
        return ids, result

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result = run_with_store(tmp_path, clock, scenario)
    assert smtp.sent == []
    assert result.pending == {ids[0]: Reason.DELIVERY_HELD_ELSEWHERE} and not result.done
    assert reasons_logged(caplog) == []


def test_a_row_whose_sender_died_mid_send_is_sent_again_and_logged_as_uncertain(tmp_path, clock, caplog):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        await store.reserve_deliveries("dead-replica", "ann@example.test", OWNER, ids, HOLD)
        clock.advance(HOLD + 1)
        result = await notifier_for(store, clock, smtp).notify(await store.incidents(ids))
        return ids, result, await store.deliveries(ids)

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result, [row] = run_with_store(tmp_path, clock, scenario)
    assert reasons_logged(caplog) == [Reason.RESEND_UNKNOWN_OUTCOME]
    assert len(smtp.sent) == 1 and result.done == set(ids)
    assert row.status is DeliveryStatus.SENT and row.attempts == 2


def test_a_failed_send_is_pending_with_its_reason_and_taken_again(tmp_path, clock, caplog):
    smtp = FakeSmtp()
    smtp.answers["ann@example.test"] = SendResult(
        SendOutcome.RETRY, Reason.SMTP_UNAVAILABLE, "connection refused"
    )

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        notifier = notifier_for(store, clock, smtp)
        failed = await notifier.notify(await store.incidents(ids))
        [after_failure] = await store.deliveries(ids)
        del smtp.answers["ann@example.test"]
        sent = await notifier.notify(await store.incidents(ids))
        return ids, failed, after_failure, sent, await store.deliveries(ids)

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, failed, after_failure, sent, [row] = run_with_store(tmp_path, clock, scenario)
    assert failed.pending == {ids[0]: Reason.SMTP_UNAVAILABLE} and not failed.done
    assert after_failure.status is DeliveryStatus.PENDING
    assert reasons_logged(caplog) == [Reason.SMTP_UNAVAILABLE]
    assert sent.done == set(ids) and row.status is DeliveryStatus.SENT and row.attempts == 2
    assert len(smtp.sent) == 2


# -- refusals and the security contact -------------------------------------------------------------


def test_a_refused_owner_is_reported_to_the_security_contact(tmp_path, clock, caplog):
    smtp = FakeSmtp()
    smtp.answers["ann@example.test"] = SendResult(
        SendOutcome.REFUSED, Reason.RECIPIENT_REFUSED, "550 no such user"
    )

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test", "bob@example.test")})
        notifier = notifier_for(store, clock, smtp)
        result = await notifier.notify(await store.incidents(ids))
        again = await notifier.notify(await store.incidents(ids))
        return ids, result, again, await store.deliveries(ids)

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result, again, rows = run_with_store(tmp_path, clock, scenario)
    assert sorted(r for r, _ in smtp.sent) == ["ann@example.test", "bob@example.test", CONTACT]
    [report] = smtp.to(CONTACT)
    assert report["Subject"] == "Could not tell ann@example.test about 1 leaked key(s)"
    assert result.done == set(ids) and result.unreachable == {ids[0]: ["ann@example.test"]}
    assert {(d.recipient, d.purpose, d.status) for d in rows} == {
        ("ann@example.test", OWNER, DeliveryStatus.REFUSED),
        ("bob@example.test", OWNER, DeliveryStatus.SENT),
        ("ann@example.test", REFUSAL, DeliveryStatus.SENT),
    }
    assert reasons_logged(caplog) == [Reason.RECIPIENT_REFUSED]
    assert len(smtp.sent) == 3, "the contact hears of a refused address once"
    assert again.done == set(ids) and again.unreachable == {ids[0]: ["ann@example.test"]}


def test_a_security_contact_that_refuses_too_is_logged_and_the_incident_is_done(tmp_path, clock, caplog):
    smtp = FakeSmtp()
    smtp.answers["ann@example.test"] = SendResult(
        SendOutcome.REFUSED, Reason.RECIPIENT_REFUSED, "550 no such user"
    )
    smtp.answers[CONTACT] = SendResult(SendOutcome.REFUSED, Reason.RECIPIENT_REFUSED, "550 mailbox full")

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        return ids, await notifier_for(store, clock, smtp).notify(await store.incidents(ids))

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result = run_with_store(tmp_path, clock, scenario)
    assert reasons_logged(caplog) == [Reason.RECIPIENT_REFUSED, Reason.SECURITY_CONTACT_REFUSED]
    contact_line = next(r for r in caplog.records if getattr(r, "reason", None) == "security_contact_refused")
    assert contact_line.levelno == logging.ERROR
    assert result.done == set(ids) and result.unreachable == {ids[0]: ["ann@example.test"]}


def test_a_malformed_address_is_refused_without_sending(tmp_path, clock, caplog):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ("not-an-address",)})
        return ids, await notifier_for(store, clock, smtp).notify(await store.incidents(ids))

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result = run_with_store(tmp_path, clock, scenario)
    assert [r for r, _ in smtp.sent] == [CONTACT]
    assert reasons_logged(caplog) == [Reason.BAD_RECIPIENT_ADDRESS]
    assert result.done == set(ids) and result.unreachable == {ids[0]: ["not-an-address"]}


def test_no_owner_address_goes_to_the_security_contact(tmp_path, clock):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ()})
        return ids, await notifier_for(store, clock, smtp).notify(await store.incidents(ids))

    ids, result = run_with_store(tmp_path, clock, scenario)
    assert [r for r, _ in smtp.sent] == [CONTACT] and result.done == set(ids)


def test_no_owner_address_and_no_security_contact_is_unreachable(tmp_path, clock, caplog):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ()})
        return ids, await notifier_for(store, clock, smtp, contact=None).notify(await store.incidents(ids))

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result = run_with_store(tmp_path, clock, scenario)
    assert smtp.sent == [] and reasons_logged(caplog) == [Reason.NO_RECIPIENT]
    assert result.done == set(ids) and result.unreachable == {ids[0]: []}


def test_an_unavailable_store_leaves_every_incident_pending(tmp_path, clock, caplog):
    smtp = FakeSmtp()

    async def scenario(store):
        ids = await alert(store, clock, {1: ("ann@example.test",)})
        batch = await store.incidents(ids)
        await store.close()
        result = await notifier_for(store, clock, smtp).notify(batch)
        await store.open()
        return ids, result

    with caplog.at_level(logging.INFO, logger="service.notify"):
        ids, result = run_with_store(tmp_path, clock, scenario)
    assert smtp.sent == [] and result.pending == {ids[0]: Reason.STORE_UNAVAILABLE} and not result.done
    assert reasons_logged(caplog) == [Reason.STORE_UNAVAILABLE]
