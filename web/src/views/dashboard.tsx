// The dashboard: totals by status, the active batches with their progress moving live (the
// `dashboard` topic), the recently finished ones, recent activity, and every batch in pages.
import { unwrap, type Schemas } from "@essayflow/client";
import { useEffect, useState } from "preact/hooks";
import { describe, label, useFocusHeading, useSignedIn, useTopic, when } from "../lib";
import { Alert, Progress, Scroll, Status } from "./common";

type DashboardBatch = Schemas["DashboardBatch"];
type BatchSummary = Schemas["BatchSummary"];

function ActiveRow({ batch }: { batch: DashboardBatch }) {
  const p = batch.phase_progress;
  const phase = batch.current_phase ? label(batch.current_phase) : "—";
  return (
    <tr data-batch={batch.batch_id}>
      <th scope="row">
        <a href={`#/batches/${batch.batch_id}`}>{batch.title}</a>
        <span class="sub">{batch.course_code}</span>
      </th>
      <td>
        <Status status={batch.status} />
      </td>
      <td>{batch.pipeline ? label(batch.pipeline) : "—"}</td>
      <td>
        {batch.steps.length ? `${batch.phases_completed} of ${batch.steps.length}` : "—"}
      </td>
      <td>
        {batch.current_phase ? (
          <>
            <span class="sub">{phase}</span>
            <Progress done={p.succeeded + p.failed} total={p.total} name={`${batch.title}: ${phase}`} />
            {p.failed > 0 && <span class="failed-count">{p.failed} failed</span>}
          </>
        ) : (
          "—"
        )}
      </td>
    </tr>
  );
}

function BatchTable({ caption, batches, empty }: { caption: string; batches: DashboardBatch[]; empty: string }) {
  if (!batches.length) {
    return (
      <section>
        <h2>{caption}</h2>
        <p class="empty">{empty}</p>
      </section>
    );
  }
  return (
    <section>
      <h2 id={`h-${caption}`}>{caption}</h2>
      <Scroll label={caption}>
      <table aria-labelledby={`h-${caption}`}>
        <thead>
          <tr>
            <th scope="col">Batch</th>
            <th scope="col">Status</th>
            <th scope="col">Pipeline</th>
            <th scope="col">Steps done</th>
            <th scope="col">Current phase</th>
          </tr>
        </thead>
        <tbody>
          {batches.map((b) => (
            <ActiveRow key={b.batch_id} batch={b} />
          ))}
        </tbody>
      </table>
      </Scroll>
    </section>
  );
}

/** Every batch of the caller, newest first, 20 at a time; read again when the dashboard moves. */
function AllBatches({ version }: { version?: number }) {
  const { api } = useSignedIn();
  const [pages, setPages] = useState<BatchSummary[][]>([]);
  const [next, setNext] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const load = async (cursor?: string) => {
    try {
      const page = unwrap(await api.GET("/v1/batches", { params: { query: { limit: 20, ...(cursor ? { cursor } : {}) } } }));
      // A live re-read replaces the first page and keeps the ones shown after it.
      setPages((old) => (cursor ? [...old, page.items] : [page.items, ...old.slice(1)]));
      if (cursor || pages.length <= 1) setNext(page.next_cursor ?? null);
      setError(null);
    } catch (e) {
      setError(describe(e));
    }
  };
  useEffect(() => {
    // At most one read a second, however fast the dashboard changes.
    const timer = setTimeout(() => void load(), version === undefined ? 0 : 1000);
    return () => clearTimeout(timer);
  }, [version]);
  // New batches push older ones across page boundaries: show each once.
  const seen = new Set<string>();
  const batches = pages.flat().filter((b) => !seen.has(b.batch_id) && seen.add(b.batch_id));
  return (
    <section>
      <h2 id="h-all">All batches</h2>
      <Alert message={error} />
      {batches.length === 0 ? (
        <p class="empty">
          No batches yet. <a href="#/new">Register one</a>.
        </p>
      ) : (
        <Scroll label="All batches">
        <table aria-labelledby="h-all">
          <thead>
            <tr>
              <th scope="col">Batch</th>
              <th scope="col">Status</th>
              <th scope="col">Essays</th>
              <th scope="col">Updated</th>
            </tr>
          </thead>
          <tbody>
            {batches.map((b) => (
              <tr key={b.batch_id}>
                <th scope="row">
                  <a href={`#/batches/${b.batch_id}`}>{b.title}</a>
                  <span class="sub">
                    {b.course_code}
                    {b.class_designation ? ` · ${b.class_designation}` : ""}
                  </span>
                </th>
                <td>
                  <Status status={b.status} />
                </td>
                <td>
                  {b.essay_count} of {b.expected_essay_count}
                </td>
                <td>{when(b.updated_at)}</td>
              </tr>
            ))}
          </tbody>
        </table>
        </Scroll>
      )}
      {next && (
        <button type="button" class="secondary" onClick={() => load(next)}>
          Show more batches
        </button>
      )}
    </section>
  );
}

export function Dashboard() {
  const heading = useFocusHeading("dashboard");
  const { document: board, version } = useTopic("dashboard");
  const totals = board ? Object.entries(board.totals).filter(([, n]) => n > 0) : [];
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        Dashboard
      </h1>
      {!board ? (
        <p class="loading" aria-busy="true">
          Loading your dashboard…
        </p>
      ) : (
        <>
          <section aria-labelledby="h-totals">
            <h2 id="h-totals">Totals</h2>
            {totals.length ? (
              <dl class="totals">
                {totals.map(([status, n]) => (
                  <div key={status} data-total={status}>
                    <dt>{status}</dt>
                    <dd>{n}</dd>
                  </div>
                ))}
              </dl>
            ) : (
              <p class="empty">No batches yet.</p>
            )}
          </section>
          <BatchTable caption="Active batches" batches={board.active_batches} empty="No batch is being processed." />
          <BatchTable caption="Recently finished" batches={board.recently_finished} empty="Nothing finished yet." />
          <section>
            <h2>Recent activity</h2>
            {board.recent_activity.length ? (
              <ol class="activity">
                {board.recent_activity.map((a) => (
                  <li key={a.position}>
                    <time dateTime={a.occurred_at}>{when(a.occurred_at)}</time>{" "}
                    <a href={`#/batches/${a.batch_id}`}>{a.title}</a>: {a.summary}
                  </li>
                ))}
              </ol>
            ) : (
              <p class="empty">Nothing yet.</p>
            )}
          </section>
        </>
      )}
      <AllBatches version={version} />
    </>
  );
}
