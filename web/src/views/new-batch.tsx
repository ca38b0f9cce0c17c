// Registers a batch (POST /v1/batches), then opens it; the batch view subscribes with the 202's
// position, so the new batch is there at once.
import { unwrap } from "@essayflow/client";
import { go, positions, useAction, useFocusHeading, useSignedIn } from "../lib";
import { Alert } from "./common";

export function NewBatch() {
  const heading = useFocusHeading("new");
  const { api } = useSignedIn();
  const action = useAction();
  const submit = (event: Event) => {
    event.preventDefault();
    const data = new FormData(event.currentTarget as HTMLFormElement);
    void action.run(async () => {
      const designation = String(data.get("class_designation") ?? "").trim();
      const accepted = unwrap(
        await api.POST("/v1/batches", {
          body: {
            title: String(data.get("title")),
            course_code: String(data.get("course_code")),
            expected_essay_count: Number(data.get("expected_essay_count")),
            ...(designation ? { class_designation: designation } : {}),
          },
        }),
      );
      positions.set(accepted.batch_id, accepted.position);
      go(`/batches/${accepted.batch_id}`);
    });
  };
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        New batch
      </h1>
      <form onSubmit={submit} class="stacked">
        <label for="title">Title</label>
        <input id="title" name="title" required maxLength={200} />
        <label for="course_code">Course code</label>
        <input
          id="course_code"
          name="course_code"
          required
          maxLength={32}
          pattern="[A-Za-z0-9_\-]+"
          aria-describedby="course-hint"
        />
        <p id="course-hint" class="hint">
          Letters, digits, “_” and “-”, for example EN-101.
        </p>
        <label for="class_designation">Class (optional)</label>
        <input id="class_designation" name="class_designation" maxLength={64} />
        <label for="expected_essay_count">Number of essays</label>
        <input id="expected_essay_count" name="expected_essay_count" type="number" min={1} max={1000} required />
        <button type="submit" disabled={action.busy}>
          Register batch
        </button>
        <Alert message={action.error} />
      </form>
    </>
  );
}
