// Small pieces every view uses.
import type { ComponentChildren, Ref } from "preact";

/** A refusal or failure, announced at once to screen readers (`role="alert"`). */
export function Alert({ message, id }: { message: string | null | undefined; id?: string }) {
  if (!message) return null;
  return (
    <p id={id} role="alert" class="error">
      {message}
    </p>
  );
}

/** The answer for a batch that does not exist or is someone else's (the server says the same). */
export function BatchNotFound({ heading }: { heading: Ref<HTMLHeadingElement> }) {
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

/** A progress bar with its numbers in text beside it (the bar alone says nothing to some). */
export function Progress({ done, total, name }: { done: number; total: number; name: string }) {
  const text = `${done} of ${total}`;
  return (
    <span class="progress">
      <progress value={done} max={Math.max(total, 1)} aria-label={name} aria-valuetext={text} />
      <span class="count">{text}</span>
    </span>
  );
}

/** A batch status, in words (its colour only repeats them). */
export function Status({ status }: { status: string }) {
  return <span class={`status status-${status}`}>{status}</span>;
}

/**
 * A wide table's container: it scrolls sideways on a narrow screen instead of the page, and can
 * be scrolled with the keyboard (it takes focus; WCAG 2.1.1).
 */
export function Scroll({ label, children }: { label: string; children: ComponentChildren }) {
  return (
    <div class="scroll" role="region" aria-label={label} tabIndex={0}>
      {children}
    </div>
  );
}

/** One term of a `<dl class="facts">`; `data` becomes `data-*` attributes of its value. */
export function Fact({
  term,
  data = {},
  children,
}: {
  term: string;
  data?: Record<string, string | number>;
  children: ComponentChildren;
}) {
  const attributes = Object.fromEntries(Object.entries(data).map(([k, v]) => [`data-${k}`, v]));
  return (
    <div>
      <dt>{term}</dt>
      <dd {...attributes}>{children}</dd>
    </div>
  );
}
