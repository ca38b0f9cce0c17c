// One batch, live (the `batch:<id>` topic): its state, the pipeline's steps, per-phase progress,
// per-essay outcomes (50 essays a page), and the commands: add essays, request a pipeline, cancel.
import { unwrap, type Schemas } from "@essayflow/client";
import { useEffect, useRef, useState } from "preact/hooks";
import { label, positions, useAction, useFocusHeading, useSignedIn, useTopic, when } from "../lib";
import { Alert, BatchNotFound, Fact, Progress, Scroll, Status } from "./common";

type BatchView = Schemas["BatchView"];
const PAGE = 50;
/** Essays per request: well under the 4 MiB body limit for essays of a few thousand words. */
const BYTES_PER_REQUEST = 3 * 1024 * 1024;

function Steps({ batch }: { batch: BatchView }) {
  const pipeline = batch.pipeline;
  if (!pipeline) return <p class="empty">No pipeline requested yet.</p>;
  const stateOf = (step: string) =>
    pipeline.completed_phases.includes(step)
      ? "done"
      : pipeline.current_phase === step
        ? "running"
        : pipeline.state === "failed" || pipeline.state === "cancelled"
          ? "not run"
          : "waiting";
  const essays = batch.essay_count;
  return (
    <>
      <p>
        <strong>{label(pipeline.requested)}</strong> requested; the pipeline is <strong>{pipeline.state}</strong>
        {pipeline.reason ? ` (${pipeline.reason})` : ""}.
        {pipeline.pruned.length > 0 && ` Skipped, already done: ${pipeline.pruned.map(label).join(", ")}.`}
      </p>
      <ol class="steps" aria-label="Pipeline steps">
        {pipeline.steps.map((step) => {
          const outcomes = Object.values(batch.phases[step] ?? {});
          const failed = outcomes.filter((o) => o.outcome === "failed").length;
          const state = stateOf(step);
          return (
            <li key={step} class={`step step-${state.replace(" ", "-")}`} data-step={step} data-state={state}>
              <span class="step-name">{label(step)}</span> <span class="step-state">{state}</span>
              <Progress done={outcomes.length} total={essays} name={`${label(step)} outcomes`} />
              {failed > 0 && <span class="failed-count">{failed} failed</span>}
            </li>
          );
        })}
      </ol>
    </>
  );
}

function Outcome({ outcome }: { outcome?: Schemas["EssayOutcomeView"] }) {
  if (!outcome) return <td class="outcome outcome-pending">—</td>;
  return (
    <td class={`outcome outcome-${outcome.outcome}`} title={outcome.error ?? undefined}>
      {outcome.outcome === "succeeded" ? "✓ succeeded" : `✗ ${outcome.outcome}`}
    </td>
  );
}

function Essays({ batch }: { batch: BatchView }) {
  const [page, setPage] = useState(0);
  const phases = batch.pipeline?.steps.length ? batch.pipeline.steps : Object.keys(batch.phases);
  const pages = Math.max(1, Math.ceil(batch.essays.length / PAGE));
  const shown = batch.essays.slice(page * PAGE, (page + 1) * PAGE);
  if (!batch.essays.length) return <p class="empty">No essays yet.</p>;
  const first = page * PAGE + 1;
  return (
    <>
      <Scroll label="Essays and outcomes">
      <table class="essays">
        <caption>
          Essays {first}–{first + shown.length - 1} of {batch.essays.length}
        </caption>
        <thead>
          <tr>
            <th scope="col">Essay</th>
            <th scope="col">Characters</th>
            {phases.map((p) => (
              <th scope="col" key={p}>
                {label(p)}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {shown.map((essay) => (
            <tr key={essay.essay_id} data-essay={essay.essay_id}>
              <th scope="row">
                {essay.title}
                <span class="sub">{essay.essay_id}</span>
              </th>
              <td>{essay.characters}</td>
              {phases.map((p) => (
                <Outcome key={p} outcome={batch.phases[p]?.[essay.essay_id]} />
              ))}
            </tr>
          ))}
        </tbody>
      </table>
      </Scroll>
      {pages > 1 && (
        <nav class="pager" aria-label="Essay pages">
          <button type="button" class="secondary" disabled={page === 0} onClick={() => setPage(page - 1)}>
            Previous essays
          </button>
          <span>
            Page {page + 1} of {pages}
          </span>
          <button type="button" class="secondary" disabled={page + 1 >= pages} onClick={() => setPage(page + 1)}>
            Next essays
          </button>
        </nav>
      )}
    </>
  );
}

function RequestPipeline({ id }: { id: string }) {
  const { api } = useSignedIn();
  const [catalog, setCatalog] = useState<Schemas["PipelineDefinition"][]>([]);
  const [done, setDone] = useState<string | null>(null);
  const action = useAction();
  useEffect(() => {
    void action.run(async () => setCatalog(unwrap(await api.GET("/v1/pipelines")).items));
  }, []);
  const submit = (event: Event) => {
    event.preventDefault();
    // The generated type lists the default catalog's names; a server may be configured with others.
    const pipeline = String(new FormData(event.currentTarget as HTMLFormElement).get("pipeline")) as "spellcheck";
    setDone(null);
    void action.run(async () => {
      unwrap(await api.POST("/v1/batches/{id}/pipelines", { params: { path: { id } }, body: { pipeline } }));
      setDone(`${label(pipeline)} requested.`);
    });
  };
  return (
    <form onSubmit={submit} class="inline">
      <label for="pipeline">Pipeline to run</label>
      <select id="pipeline" name="pipeline" required>
        <option value="">Choose a pipeline</option>
        {catalog.map((p) => (
          <option key={p.name} value={p.name}>
            {label(p.name)}
            {p.requires.length ? ` (after ${p.requires.map(label).join(", ")})` : ""}
          </option>
        ))}
      </select>
      <button type="submit" disabled={action.busy || !catalog.length}>
        Request pipeline
      </button>
      <span role="status">{done}</span>
      <Alert message={action.error} />
    </form>
  );
}

function Cancel({ id }: { id: string }) {
  const { api } = useSignedIn();
  const [asking, setAsking] = useState(false);
  const action = useAction();
  const reason = useRef<HTMLInputElement>(null);
  const trigger = useRef<HTMLButtonElement>(null);
  const opened = useRef(false);
  // Keyboard focus follows the swap: into the form when it opens, back to the button after.
  useEffect(() => {
    if (asking) reason.current?.focus();
    else if (opened.current) trigger.current?.focus();
    opened.current ||= asking;
  }, [asking]);
  if (!asking) {
    return (
      <button type="button" class="danger" ref={trigger} onClick={() => setAsking(true)}>
        Cancel batch…
      </button>
    );
  }
  const submit = (event: Event) => {
    event.preventDefault();
    const text = String(new FormData(event.currentTarget as HTMLFormElement).get("reason") ?? "").trim();
    void action.run(async () => {
      unwrap(
        await api.POST("/v1/batches/{id}/cancel", { params: { path: { id } }, body: text ? { reason: text } : {} }),
      );
      setAsking(false);
    });
  };
  return (
    <form onSubmit={submit} class="inline confirm">
      <label for="cancel-reason">Why (optional)</label>
      <input id="cancel-reason" name="reason" maxLength={500} ref={reason} />
      <button type="submit" class="danger" disabled={action.busy}>
        Confirm cancel
      </button>
      <button type="button" class="secondary" onClick={() => setAsking(false)}>
        Keep the batch
      </button>
      <Alert message={action.error} />
    </form>
  );
}

/** An essay id from a file name: the characters ids may hold (`[A-Za-z0-9_.:-]`), at most 64. */
function essayIdOf(fileName: string): string {
  return fileName.replace(/\.[^.]+$/, "").replace(/[^A-Za-z0-9_.:-]/g, "_").slice(0, 64) || "essay";
}

function AddEssays({ id, full, essays: inBatch }: { id: string; full: boolean; essays: { essay_id: string }[] }) {
  const { api } = useSignedIn();
  const [done, setDone] = useState<string | null>(null);
  const action = useAction();
  const send = async (essays: { title: string; text: string; essay_id?: string }[]) => {
    // In requests of at most about 3 MiB each.
    let chunk: typeof essays = [];
    let bytes = 0;
    let sent = 0;
    const flush = async () => {
      if (!chunk.length) return;
      unwrap(await api.POST("/v1/batches/{id}/essays", { params: { path: { id } }, body: { essays: chunk } }));
      sent += chunk.length;
      setDone(`${sent} of ${essays.length} essays added.`);
      chunk = [];
      bytes = 0;
    };
    for (const essay of essays) {
      // As sent: JSON-escaped, UTF-8.
      const size = new TextEncoder().encode(JSON.stringify(essay)).length + 1;
      if (bytes + size > BYTES_PER_REQUEST) await flush();
      chunk.push(essay);
      bytes += size;
    }
    await flush();
  };
  const fromFiles = (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const files = [...((form.elements.namedItem("files") as HTMLInputElement).files ?? [])];
    setDone(null);
    void action.run(async () => {
      // Each file's essay id comes from its name, so that sending the same files again (after a
      // failure half-way) adds only those not yet in the batch.
      const existing = new Set(inBatch.map((e) => e.essay_id));
      const fresh = files.filter((file) => !existing.has(essayIdOf(file.name)));
      const essays = await Promise.all(
        fresh.map(async (file) => ({
          essay_id: essayIdOf(file.name),
          title: file.name.replace(/\.[^.]+$/, ""),
          text: await file.text(),
        })),
      );
      if (fresh.length < files.length) setDone(`${files.length - fresh.length} of the files are in the batch already.`);
      await send(essays);
      form.reset();
    });
  };
  const one = (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const data = new FormData(form);
    setDone(null);
    void action.run(async () => {
      const essayId = String(data.get("essay_id") ?? "").trim();
      await send([
        {
          title: String(data.get("title")),
          text: String(data.get("text")),
          ...(essayId ? { essay_id: essayId } : {}),
        },
      ]);
      form.reset();
    });
  };
  return (
    <section aria-labelledby="h-add">
      <h2 id="h-add">Add essays</h2>
      {full && <p>Every expected essay is in.</p>}
      <fieldset disabled={full} class="plain">
      <form onSubmit={fromFiles} class="inline">
        <label for="files">Text files (one essay each)</label>
        <input id="files" name="files" type="file" accept=".txt,text/plain" multiple required />
        <button type="submit" disabled={action.busy}>
          Add files
        </button>
      </form>
      <form onSubmit={one} class="stacked">
        <label for="essay-title">Title</label>
        <input id="essay-title" name="title" required maxLength={500} />
        <label for="essay-id">Essay id (optional)</label>
        <input id="essay-id" name="essay_id" maxLength={64} pattern="[A-Za-z0-9_.:\-]+" />
        <label for="essay-text">Text</label>
        <textarea id="essay-text" name="text" rows={6} required />
        <button type="submit" disabled={action.busy}>
          Add essay
        </button>
      </form>
      </fieldset>
      <p role="status">{done}</p>
      <Alert message={action.error} />
    </section>
  );
}

export function BatchPage({ id }: { id: string }) {
  const heading = useFocusHeading(id);
  const { document: batch, refused } = useTopic(`batch:${id}`, positions.get(id));
  if (refused) {
    return <BatchNotFound heading={heading} />;
  }
  if (!batch) {
    return (
      <h1 ref={heading} tabIndex={-1} aria-busy="true">
        Loading the batch…
      </h1>
    );
  }
  // A batch that finished or was cancelled can be given a new pipeline, not cancelled.
  const cancellable = ["registered", "ready", "processing"].includes(batch.status);
  const open = batch.status !== "cancelled";
  // Shown until a pipeline starts, so that an upload's outcome stays on screen after the last essay.
  const accepting = ["registered", "ready"].includes(batch.status);
  const full = batch.essay_count >= batch.expected_essay_count;
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        {batch.title}
      </h1>
      <dl class="facts">
        <Fact term="Status" data={{ status: batch.status }}>
          <Status status={batch.status} />
        </Fact>
        <Fact term="Course">
          {batch.course_code}
          {batch.class_designation ? ` · ${batch.class_designation}` : ""}
        </Fact>
        <Fact term="Essays">
          {batch.essay_count} of {batch.expected_essay_count}
        </Fact>
        <Fact term="Version" data={{ version: batch.version }}>
          {batch.version}
        </Fact>
        <Fact term="Updated">{when(batch.updated_at)}</Fact>
      </dl>
      {batch.cancel_reason && <p>Cancelled: {batch.cancel_reason}</p>}
      <p>
        <a href={`#/batches/${id}/history`}>Event history</a>
      </p>
      <section aria-labelledby="h-pipeline">
        <h2 id="h-pipeline">Pipeline</h2>
        <Steps batch={batch} />
        {open && (
          <div class="actions">
            <RequestPipeline id={id} />
            {cancellable && <Cancel id={id} />}
          </div>
        )}
      </section>
      {accepting && (
        <AddEssays id={id} full={full} essays={batch.essays} />
      )}
      <section aria-labelledby="h-essays">
        <h2 id="h-essays">Essays and outcomes</h2>
        <Essays batch={batch} />
      </section>
    </>
  );
}
