// The page served by `essayflow serve` at `/` (embedded from dist/ by api/src/routes/page.rs).
// `npm run build` writes dist/; scripts/test.sh checks the committed dist/ equals a fresh build.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  resolve: {
    alias: {
      // The client's TypeScript sources, bundled (not its compiled dist/).
      "@essayflow/client": fileURLToPath(new URL("../clients/typescript/src/index.ts", import.meta.url)),
    },
  },
  oxc: {
    jsx: { runtime: "automatic", importSource: "preact" },
  },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    // No inline polyfill script: the page's CSP allows scripts from its own origin only.
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    sourcemap: false,
    reportCompressedSize: false,
  },
  server: {
    // `npm run dev`: the page on Vite's server, the API on a running `essayflow serve`.
    proxy: {
      "/v1": { target: "http://127.0.0.1:8080", ws: true },
    },
  },
});
