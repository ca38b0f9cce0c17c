// A batch's event history: a slider over its versions shows the batch as it was after each event
// (GET /v1/batches/{id}?at_version=N, folded from the log) beside that event; the events are
// listed 100 at a time (GET /v1/batches/{id}/events).
import { unwrap, type Schemas } from "@essayflow/client";
import { useEffect, useRef, useState } from "preact/hooks";
import { describe, label, useFocusHeading, useSignedIn, useTopic, when } from "../lib";
import { Status } from "./dashboard";

type Event = Schemas["EventResponse"];

function AsOf({ batch }: { batch: Schemas["BatchView"] }) {
  const phases = Object.entries(batch.phases);
  return (
    <dl class="facts" aria-label={`The batch at version ${batch.version}`}>
      <div>
        <dt>Status</dt>
        <dd data-status={batch.status}>
          <Status status={batch.status} />
        </dd>
      </div>
      <div>
        <dt>Essays</dt>
        <dd>
          {batch.essay_count} of {batch.expected_essay_count}
        </dd>
      </div>
      <div>
        <dt>Pipeline</dt>
        <dd>{batch.pipeline ? `${label(batch.pipeline.requested)}: ${batch.pipeline.state}` : "none"}</dd>
      </div>
      {phases.map(([phase, outcomes]) => {
        const all = Object.values(outcomes);
        const failed = all.filter((o) => o.outcome === "failed").length;
        return (
          <div key={phase}>
            <dt>{label(phase)}</dt>
            <dd>
              {all.length - failed} succeeded, {failed} failed
            </dd>
          </div>
        );
      })}
    </dl>
  );
}

export function History({ id }: { id: string }) {
  const heading = useFocusHeading(`history-${id}`);
  const { api } = useSignedIn();
  const { document: live, refused } = useTopic(`batch:${id}`);
  const latest = live?.version ?? 0;
  const [chosen, setChosen] = useState<number | null>(null);
  const version = chosen ?? latest;
  const [asOf, setAsOf] = useState<Schemas["BatchView"] | null>(null);
  const [event, setEvent] = useState<Event | null>(null);
  const [events, setEvents] = useState<Event[]>([]);
  const [next, setNext] = useState<string | null | undefined>(undefined);
  const [error, setError] = useState<string | null>(null);
  const request = useRef(0);

  // The batch as of `version`, and the event that made it: read once the slider rests 150 ms.
  useEffect(() => {
    if (!version) return;
    const mine = ++request.current;
    const timer = setTimeout(async () => {
      try {
        const [batch, page] = await Promise.all([
          api.GET("/v1/batches/{id}", { params: { path: { id }, query: { at_version: version } } }).then(unwrap),
          api
            .GET("/v1/batches/{id}/events", { params: { path: { id }, query: { after: String(version - 1), limit: 1 } } })
            .then(unwrap),
        ]);
        if (mine !== request.current) return;
        setAsOf(batch);
        setEvent(page.items[0] ?? null);
        setError(null);
      } catch (e) {
        if (mine === request.current) setError(describe(e));
      }
    }, 150);
    return () => clearTimeout(timer);
  }, [version]);

  const more = async () => {
    try {
      const page = unwrap(
        await api.GET("/v1/batches/{id}/events", {
          params: { path: { id }, query: { limit: 100, ...(next ? { after: next } : {}) } },
        }),
      );
      setEvents((old) => [...old, ...page.items]);
      setNext(page.next_cursor ?? null);
    } catch (e) {
      setError(describe(e));
    }
  };
  useEffect(() => void more(), []);

  if (refused) {
    return (
      <>
        <h1 ref={heading} tabIndex={-1}>
          Batch not found
        </h1>
        <p>
          There is no such batch, or it is not yours. <a href="#/">Back to the dashboard</a>.
        </p>
      </>
    );
  }
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        History{live ? `: ${live.title}` : ""}
      </h1>
      <p>
        <a href={`#/batches/${id}`}>Back to the batch</a>
      </p>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      {latest > 0 && (
        <section aria-labelledby="h-asof">
          <h2 id="h-asof">The batch as of a version</h2>
          <div class="slider">
            <label for="at-version">Version</label>
            <input
              id="at-version"
              type="range"
              min={1}
              max={latest}
              step={1}
              value={version}
              aria-valuetext={`version ${version} of ${latest}${event ? `: ${event.event_type}` : ""}`}
              onInput={(e) => setChosen(Number((e.currentTarget as HTMLInputElement).value))}
            />
            <output for="at-version" data-version={version}>
              {version} of {latest}
            </output>
            {chosen !== null && chosen !== latest && (
              <button type="button" class="secondary" onClick={() => setChosen(null)}>
                Follow the latest
              </button>
            )}
          </div>
          {event && event.sequence === version && (
            <p class="event-at">
              Event {event.sequence}: <strong>{event.event_type}</strong> at{" "}
              <time dateTime={event.occurred_at}>{when(event.occurred_at)}</time>
            </p>
          )}
          {asOf && asOf.version === version && <AsOf batch={asOf} />}
        </section>
      )}
      <section aria-labelledby="h-events">
        <h2 id="h-events">Events</h2>
        <table>
          <thead>
            <tr>
              <th scope="col">Version</th>
              <th scope="col">Event</th>
              <th scope="col">When</th>
              <th scope="col">Position</th>
            </tr>
          </thead>
          <tbody>
            {events.map((e) => (
              <tr key={e.sequence} aria-current={e.sequence === version ? "true" : undefined}>
                <td>
                  <button type="button" class="link" onClick={() => setChosen(e.sequence)}>
                    {e.sequence}
                  </button>
                </td>
                <td>{e.event_type}</td>
                <td>
                  <time dateTime={e.occurred_at}>{when(e.occurred_at)}</time>
                </td>
                <td>{e.position}</td>
              </tr>
            ))}
          </tbody>
        </table>
        {next && (
          <button type="button" class="secondary" onClick={more}>
            Show more events
          </button>
        )}
      </section>
    </>
  );
}
