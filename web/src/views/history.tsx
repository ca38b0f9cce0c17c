// A batch's event history: a slider over its versions shows the batch as it was after each event
// (GET /v1/batches/{id}?at_version=N, folded from the log) beside that event; the events are
// listed 100 at a time (GET /v1/batches/{id}/events).
import { unwrap, type Schemas } from "@essayflow/client";
import { useEffect, useRef, useState } from "preact/hooks";
import { describe, label, useFocusHeading, useSignedIn, useTopic, when } from "../lib";
import { Alert, BatchNotFound, Fact, Scroll, Status } from "./common";

type Event = Schemas["EventResponse"];

function AsOf({ batch }: { batch: Schemas["BatchView"] }) {
  const phases = Object.entries(batch.phases);
  return (
    <dl class="facts" aria-label={`The batch at version ${batch.version}`}>
      <Fact term="Status" data={{ status: batch.status }}>
        <Status status={batch.status} />
      </Fact>
      <Fact term="Essays">
        {batch.essay_count} of {batch.expected_essay_count}
      </Fact>
      <Fact term="Pipeline">
        {batch.pipeline ? `${label(batch.pipeline.requested)}: ${batch.pipeline.state}` : "none"}
      </Fact>
      {phases.map(([phase, outcomes]) => {
        const all = Object.values(outcomes);
        const failed = all.filter((o) => o.outcome === "failed").length;
        return (
          <Fact key={phase} term={label(phase)}>
            {all.length - failed} succeeded, {failed} failed
          </Fact>
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

  // The event that made `version`, and (for a chosen version) the batch as of it, read once the
  // slider rests 150 ms (while following the latest, at most that often). Until the answer
  // comes, the previous one stays on screen, labelled with its own version.
  useEffect(() => {
    if (!version) return;
    const mine = ++request.current;
    const timer = setTimeout(async () => {
      try {
        const [batch, page] = await Promise.all([
          chosen === null
            ? Promise.resolve(null)
            : api.GET("/v1/batches/{id}", { params: { path: { id }, query: { at_version: version } } }).then(unwrap),
          api
            .GET("/v1/batches/{id}/events", { params: { path: { id }, query: { after: String(version - 1), limit: 1 } } })
            .then(unwrap),
        ]);
        if (mine !== request.current) return;
        if (batch) setAsOf(batch);
        setEvent(page.items[0] ?? null);
        setError(null);
      } catch (e) {
        if (mine === request.current) setError(describe(e));
      }
    }, 150);
    return () => clearTimeout(timer);
  }, [version, chosen === null]);

  // The events, 100 at a time; once the last page is loaded, new events are appended as the
  // batch moves (read at most once a second).
  const loading = useRef(false);
  const more = async () => {
    if (loading.current) return;
    loading.current = true;
    try {
      const after = next ?? (events.length ? String(events[events.length - 1]!.sequence) : undefined);
      const page = unwrap(
        await api.GET("/v1/batches/{id}/events", {
          params: { path: { id }, query: { limit: 100, ...(after ? { after } : {}) } },
        }),
      );
      setEvents((old) => [...old, ...page.items.filter((e) => !old.length || e.sequence > old[old.length - 1]!.sequence)]);
      setNext(page.next_cursor ?? null);
    } catch (e) {
      setError(describe(e));
    } finally {
      loading.current = false;
    }
  };
  useEffect(() => void more(), []);
  const lastLoaded = events.length ? events[events.length - 1]!.sequence : 0;
  useEffect(() => {
    if (next !== null || !latest || lastLoaded >= latest) return;
    const timer = setTimeout(() => void more(), 1000);
    return () => clearTimeout(timer);
  }, [latest, lastLoaded, next]);

  // Following the latest version, the live document is the batch as of it.
  const shown = chosen === null ? (live ?? null) : asOf;

  if (refused) {
    return <BatchNotFound heading={heading} />;
  }
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        History{live ? `: ${live.title}` : ""}
      </h1>
      <p>
        <a href={`#/batches/${id}`}>Back to the batch</a>
      </p>
      <Alert message={error} />
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
          {event && (
            <p class="event-at">
              Event {event.sequence}: <strong>{event.event_type}</strong> at{" "}
              <time dateTime={event.occurred_at}>{when(event.occurred_at)}</time>
            </p>
          )}
          {shown && <AsOf batch={shown} />}
        </section>
      )}
      <section aria-labelledby="h-events">
        <h2 id="h-events">Events</h2>
        <Scroll label="Events">
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
        </Scroll>
        {next && (
          <button type="button" class="secondary" onClick={more}>
            Show more events
          </button>
        )}
      </section>
    </>
  );
}
