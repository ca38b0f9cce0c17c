// The page served at `/` by `essayflow serve`: sign-in, then the views of lib.ts's router.
import {
  createApi,
  LiveClient,
  liveUrl,
  ProblemError,
  Session,
  type LiveStatus,
  type TokenStore,
} from "@essayflow/client";
import { render } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { Context, describe, useFocusHeading, useRoute, type SignedIn } from "./lib";
import { Admin } from "./views/admin";
import { BatchPage } from "./views/batch";
import { Dashboard } from "./views/dashboard";
import { History } from "./views/history";
import { NewBatch } from "./views/new-batch";
import { Alert } from "./views/common";
import "./style.css";

/**
 * The refresh token is held by the open page and written to the tab's `sessionStorage` only
 * when the page goes away (reload, navigation), and taken out again when it loads. So a reload
 * stays signed in, but a duplicated tab (which copies `sessionStorage`) finds nothing and signs
 * in on its own: two pages refreshing one token family would spend each other's tokens, and the
 * server would revoke the session (RFC 9700 reuse detection).
 */
function tabStore(): TokenStore {
  let held: string | null = null;
  let key: string | null = null;
  addEventListener("pagehide", () => {
    if (key && held) sessionStorage.setItem(key, held);
  });
  addEventListener("pageshow", (event) => {
    if (event.persisted && key) sessionStorage.removeItem(key); // back from the bfcache
  });
  return {
    getItem(k) {
      key = k;
      held = sessionStorage.getItem(k);
      sessionStorage.removeItem(k);
      return held;
    },
    setItem(k, value) {
      key = k;
      held = value;
    },
    removeItem(k) {
      key = k;
      held = null;
      sessionStorage.removeItem(k);
    },
  };
}

const sessionOptions = { baseUrl: location.origin, store: tabStore() };

function Login({ onSignedIn, notice }: { onSignedIn: (session: Session) => void; notice: string | null }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const heading = useFocusHeading("login");
  const submit = async (event: Event) => {
    event.preventDefault();
    const form = new FormData(event.currentTarget as HTMLFormElement);
    setBusy(true);
    setError(null);
    try {
      onSignedIn(await Session.login(sessionOptions, String(form.get("username")), String(form.get("password"))));
    } catch (e) {
      setError(
        e instanceof ProblemError && e.status === 401 ? "Wrong username or password." : describe(e),
      );
      setBusy(false);
    }
  };
  return (
    <main id="main" class="login">
      <h1 ref={heading} tabIndex={-1}>
        essayflow
      </h1>
      <p>Sign in to follow your batches of essays.</p>
      {notice && (
        <p role="status" class="notice">
          {notice}
        </p>
      )}
      <form onSubmit={submit} aria-describedby={error ? "login-error" : undefined}>
        <label for="username">Username</label>
        <input id="username" name="username" autocomplete="username" required />
        <label for="password">Password</label>
        <input id="password" name="password" type="password" autocomplete="current-password" required />
        <button type="submit" disabled={busy}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
        <Alert id="login-error" message={error} />
      </form>
    </main>
  );
}

const STATUS_TEXT: Record<LiveStatus, string> = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  revoked: "Access revoked: sign in again",
  closed: "Offline",
};

function Shell({
  signedIn,
  status,
  onSignOut,
}: {
  signedIn: SignedIn;
  status: LiveStatus;
  onSignOut: () => void;
}) {
  const route = useRoute();
  const { claims } = signedIn.session;
  const view = (() => {
    switch (route.view) {
      case "dashboard":
        return <Dashboard />;
      case "new":
        return <NewBatch />;
      case "batch":
        return <BatchPage key={route.id} id={route.id} />;
      case "history":
        return <History key={route.id} id={route.id} />;
      case "admin":
        return claims.role === "admin" ? <Admin /> : <Missing path="/admin" />;
      default:
        return <Missing path={route.path} />;
    }
  })();
  const current = (view: string) => (route.view === view ? "page" : undefined);
  return (
    <Context.Provider value={signedIn}>
      <a class="skip" href="#main" onClick={(e) => (e.preventDefault(), document.getElementById("main")?.focus())}>
        Skip to content
      </a>
      <header>
        <nav aria-label="Main">
          <a href="#/" class="brand" aria-current={current("dashboard")}>
            essayflow
          </a>
          <a href="#/" aria-current={current("dashboard")}>
            Dashboard
          </a>
          <a href="#/new" aria-current={current("new")}>
            New batch
          </a>
          {claims.role === "admin" && (
            <a href="#/admin" aria-current={current("admin")}>
              Projections
            </a>
          )}
        </nav>
        <p class={`live live-${status}`} role="status" aria-live="polite" data-live={status}>
          {STATUS_TEXT[status]}
        </p>
        <p class="who">
          {claims.name} <span class="role">({claims.role})</span>
        </p>
        <button type="button" class="secondary" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        {view}
      </main>
    </Context.Provider>
  );
}

function Missing({ path }: { path: string }) {
  const heading = useFocusHeading(path);
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        Not found
      </h1>
      <p>
        There is nothing at <code>{path}</code>. <a href="#/">Back to the dashboard</a>.
      </p>
    </>
  );
}

function App() {
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [notice, setNotice] = useState<string | null>(null);
  const [liveStatus, setLiveStatus] = useState<LiveStatus>("closed");
  useEffect(() => {
    Session.resume(sessionOptions).then(setSession, (error) => {
      setNotice(`${describe(error)} Sign in when the server is back.`);
      setSession(null);
    });
  }, []);
  const signedIn = useMemo<SignedIn | null>(() => {
    if (!session) return null;
    const live = new LiveClient({
      url: liveUrl(location.origin),
      tokens: session,
      onStatus: (status) => {
        setLiveStatus(status);
        // 4403: the user's access changed (disabled, role, password, session revoked). A
        // refresh tells whether the session survives; if not, it ends (below).
        if (status === "revoked") session.refresh().catch(() => {});
      },
    });
    return { session, api: createApi({ baseUrl: location.origin, session }), live };
  }, [session]);
  useEffect(() => {
    if (!session) return;
    // The session ended by itself: signed out elsewhere, access revoked, refresh token refused.
    const off = session.onChange((tokens) => {
      if (tokens !== null) return;
      setNotice("Your session ended (signed out elsewhere, or your access changed): sign in again.");
      setSession(null);
    });
    return () => {
      off();
      signedIn?.live.close();
      session.close();
    };
  }, [session]);
  if (session === undefined) return <p class="loading">Loading…</p>;
  if (!signedIn) {
    return (
      <Login
        notice={notice}
        onSignedIn={(s) => {
          setNotice(null);
          setSession(s);
        }}
      />
    );
  }
  const signOut = async () => {
    let told = true;
    try {
      await signedIn.session.logout();
    } catch {
      told = false;
    }
    // Set after logout's own "ended" notice, which this replaces.
    setNotice(
      told
        ? "You are signed out."
        : "You are signed out here, but the server could not be reached to end the session: " +
            "sign in and out again when it is back to end it everywhere.",
    );
    setSession(null);
  };
  return <Shell signedIn={signedIn} status={liveStatus} onSignOut={() => void signOut()} />;
}

render(<App />, document.getElementById("app")!);
