// For admins: the read models (projections) with their checkpoint and lag, the running or last
// rebuild and verification, and buttons to verify or rebuild one. Read every 2 s while shown.
import { unwrap, type Schemas } from "@essayflow/client";
import { useEffect, useRef, useState } from "preact/hooks";
import { describe, useAction, useFocusHeading, useSignedIn, when } from "../lib";
import { Alert, Scroll } from "./common";

type Projection = Schemas["ProjectionStatus"];

function Rebuild({ p }: { p: Projection }) {
  const r = p.rebuild;
  if (!r) return <>never</>;
  const eta = r.eta_seconds != null ? `, about ${Math.ceil(r.eta_seconds)} s left` : "";
  return (
    <>
      <span class="sub">{r.state}</span>
      <progress value={r.events_done} max={Math.max(r.events_total, 1)} aria-label={`Rebuild of ${p.name}`} />{" "}
      {r.events_done} of {r.events_total} events{r.finished_at ? `, ${when(r.finished_at)}` : eta}
      {r.error && <span class="error"> {r.error}</span>}
    </>
  );
}

function Verification({ p }: { p: Projection }) {
  const v = p.verification;
  if (!v) return <>never</>;
  return (
    <span data-differing={v.rows_differing}>
      {v.rows_differing === 0 ? "✓ matches the log" : `✗ ${v.rows_differing} rows differ`} ({v.rows_compared} rows,{" "}
      {v.events} events)
    </span>
  );
}

export function Admin() {
  const heading = useFocusHeading("admin");
  const { api } = useSignedIn();
  const [projections, setProjections] = useState<Projection[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [message, setMessage] = useState<string | null>(null);
  const action = useAction();
  const [asking, setAsking] = useState<string | null>(null);
  // Keyboard focus follows the swap: onto "Confirm rebuild" when asked, back to "Rebuild…" after.
  const asked = useRef<string | null>(null);
  useEffect(() => {
    const id = asking ? `confirm-rebuild-${asking}` : asked.current ? `rebuild-${asked.current}` : null;
    if (id) document.getElementById(id)?.focus();
    asked.current = asking;
  }, [asking]);

  useEffect(() => {
    let stopped = false;
    let timer: ReturnType<typeof setTimeout>;
    const read = async () => {
      try {
        const list = unwrap(await api.GET("/v1/admin/projections"));
        if (!stopped) (setProjections(list), setError(null));
      } catch (e) {
        if (!stopped) setError(describe(e));
      }
      if (!stopped) timer = setTimeout(read, 2000);
    };
    void read();
    return () => ((stopped = true), clearTimeout(timer));
  }, []);

  const start = (name: string, job: "verify" | "rebuild") =>
    action.run(async () => {
      const path = job === "verify" ? "/v1/admin/projections/{name}/verify" : "/v1/admin/projections/{name}/rebuild";
      const accepted = unwrap(await api.POST(path, { params: { path: { name: name as "dashboard" } } }));
      setAsking(null);
      setMessage(
        job === "verify"
          ? `Verifying ${accepted.projection}: the result appears below.`
          : `Rebuilding ${accepted.projection}${accepted.resumed_from ? ` (resumed from ${accepted.resumed_from} events)` : ""}: follow it below.`,
      );
    });

  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        Projections
      </h1>
      <p>
        The read models built from the event log. Verifying compares one with a fresh fold of the log; rebuilding
        folds the log beside the live model and swaps it in when caught up (safe while the service runs).
      </p>
      <p role="status">{message}</p>
      <Alert message={error ?? action.error} />
      {!projections ? (
        <p class="loading">Loading…</p>
      ) : (
        <Scroll label="Projections">
        <table>
          <thead>
            <tr>
              <th scope="col">Projection</th>
              <th scope="col">State</th>
              <th scope="col">Checkpoint</th>
              <th scope="col">Lag (events)</th>
              <th scope="col">Last rebuild</th>
              <th scope="col">Last verification</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {projections.map((p) => (
              <tr key={p.name} data-projection={p.name}>
                <th scope="row">{p.name}</th>
                <td>{p.state}</td>
                <td>{p.checkpoint}</td>
                <td data-lag={p.lag}>{p.lag}</td>
                <td>
                  <Rebuild p={p} />
                </td>
                <td>
                  <Verification p={p} />
                </td>
                <td class="actions">
                  <button type="button" class="secondary" disabled={action.busy} onClick={() => start(p.name, "verify")}>
                    Verify <span class="visually-hidden">{p.name}</span>
                  </button>
                  {asking === p.name ? (
                    <>
                      <button
                        type="button"
                        class="danger"
                        id={`confirm-rebuild-${p.name}`}
                        disabled={action.busy}
                        onClick={() => start(p.name, "rebuild")}
                      >
                        Confirm rebuild <span class="visually-hidden">of {p.name}</span>
                      </button>
                      <button type="button" class="secondary" onClick={() => setAsking(null)}>
                        Keep
                      </button>
                    </>
                  ) : (
                    <button
                      type="button"
                      class="secondary"
                      id={`rebuild-${p.name}`}
                      disabled={action.busy}
                      onClick={() => setAsking(p.name)}
                    >
                      Rebuild… <span class="visually-hidden">{p.name}</span>
                    </button>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
        </Scroll>
      )}
    </>
  );
}
