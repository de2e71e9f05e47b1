"""Agent state and workspace state from the runner's heartbeats: on the session, in the list, as events."""

from __future__ import annotations

from tests.api.test_internal import beat, new_session
from tests.conftest import both_databases, make_tenant


@both_databases
async def test_agent_state_changes_show_on_the_session_and_are_recorded_once(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    assert (await beat(app, sid, runner, agent_state="working")).status == 200
    for _ in range(2):  # the same state again is no new event
        resp = await beat(app, sid, runner, agent_state="needs_input", agent_message="approve the migration?",
                          work={"dirty_files": 3, "unpushed_commits": 1})
        assert resp.status == 200
    _, got = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert got.json["agent_state"] == "needs_input"
    assert got.json["agent_message"] == "approve the migration?" and got.json["agent_state_at"]
    assert got.json["work"]["dirty_files"] == 3 and got.json["work"]["unpushed_commits"] == 1
    _, listing = await app.asgi_client.get("/v1/instances", headers=t.headers)
    assert [i["agent_state"] for i in listing.json["instances"]] == ["needs_input"]

    await beat(app, sid, runner, agent_state="exited", agent_exit_code=3)
    await beat(app, sid, runner)  # a heartbeat without the state (an older runner) changes nothing
    _, status = await app.asgi_client.get(f"/v1/instances/{sid}/status", headers=t.headers)
    agent_events = [(e["from_state"], e["to_state"], e["message"]) for e in status.json["events"]
                    if e["kind"] == "agent"]
    assert agent_events == [(None, "working", "working"),
                            ("working", "needs_input", "needs_input: approve the migration?"),
                            ("needs_input", "exited", "exited with code 3")]
    assert status.json["instance"]["agent_exit_code"] == 3 and status.json["instance"]["agent_message"] is None


async def test_an_agent_message_with_control_characters_is_refused(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    resp = await beat(app, sid, runner, agent_state="needs_input", agent_message="a\x1b[31mb")
    assert resp.status == 422
    resp = await beat(app, sid, runner, agent_state="asleep")
    assert resp.status == 422
