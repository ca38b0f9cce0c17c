import { render } from "preact";
function App() { return <h1>essayflow</h1>; }
render(<App />, document.getElementById("app")!);
