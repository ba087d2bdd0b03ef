// automerge-repo clients of sync-node, driven by sync-node/tests/js_clients.rs.
//
//   node clients.mjs create WS API TOKEN          prints {"url", "heads"} once the node holds the document
//   node clients.mjs find WS URL                  prints {"value", "heads"} of the document
//   node clients.mjs watch WS URL KEY VALUE       prints {"value"} once doc[KEY] == VALUE arrives
//   node clients.mjs edit WS API TOKEN URL KEY VALUE   sets doc[KEY] = VALUE; prints {"heads"} once the node holds it
//   node clients.mjs open WS URL                  prints {"value"}, or {"unavailable": true} within 3 s
//   node clients.mjs try-edit WS URL KEY VALUE    sets doc[KEY] = VALUE, waits a second, prints {"heads"}
//   node clients.mjs presence WS URL NAME         broadcasts {"from": NAME} every 100 ms; prints
//                                                 {"heard", "sender"} of the first from another client,
//                                                 3 s after it arrived
//
// WS is the node's ws://.../v1/automerge-repo?token=... URL; API its http:// base.
// Every command gives up after 30 s.
import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [command, ...args] = process.argv.slice(2)
const deadline = setTimeout(() => {
  console.error(`${command}: timed out`)
  process.exit(2)
}, 30_000)

function repoAt(ws) {
  return new Repo({ network: [new WebSocketClientAdapter(ws, 500)] })
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const hexHeads = handle => A.getHeads(handle.doc()).slice().sort()

// The node's heads of the document of `url`, stored as repo/ID or found by its URL.
async function nodeHeads(api, token, id) {
  const response = await fetch(`${api}/v1/docs/${encodeURIComponent(id)}`, {
    headers: { authorization: `Bearer ${token}` },
  })
  if (!response.ok) return null
  return (await response.json()).heads.slice().sort()
}

async function untilNodeHolds(api, token, id, heads) {
  for (;;) {
    const there = await nodeHeads(api, token, id)
    if (there && JSON.stringify(there) === JSON.stringify(heads)) return
    await sleep(20)
  }
}

async function find(repo, url) {
  for (;;) {
    try {
      return await repo.find(url)
    } catch (e) {
      // Unavailable at this site (yet): ask again.
      await sleep(100)
    }
  }
}

const finish = (repo, output) => {
  console.log(JSON.stringify(output))
  clearTimeout(deadline)
  repo.shutdown().finally(() => process.exit(0))
}

if (command === "create") {
  const [ws, api, token] = args
  const repo = repoAt(ws)
  const handle = repo.create({ title: "from js", items: ["a", "b"], count: 1 })
  const heads = hexHeads(handle)
  await untilNodeHolds(api, token, `repo/${handle.documentId}`, heads)
  finish(repo, { url: handle.url, heads })
} else if (command === "find") {
  const [ws, url] = args
  const repo = repoAt(ws)
  const handle = await find(repo, url)
  finish(repo, { value: handle.doc(), heads: hexHeads(handle) })
} else if (command === "watch") {
  const [ws, url, key, value] = args
  const repo = repoAt(ws)
  const handle = await find(repo, url)
  // Strings written at the node read as ImmutableString here.
  const done = () => String(handle.doc()[key]) === value
  handle.on("change", () => {
    if (done()) finish(repo, { value: handle.doc() })
  })
  if (done()) finish(repo, { value: handle.doc() })
  // Ready: the writer may start now.
  console.error("watching")
} else if (command === "edit") {
  const [ws, api, token, url, key, value] = args
  const repo = repoAt(ws)
  const handle = await find(repo, url)
  handle.change(doc => {
    doc[key] = value
  })
  const heads = hexHeads(handle)
  await untilNodeHolds(api, token, `repo/${handle.documentId}`, heads)
  finish(repo, { heads })
} else if (command === "open") {
  // One try within 3 s: the document, or that the node does not give it.
  const [ws, url] = args
  const repo = repoAt(ws)
  const found = await Promise.race([
    repo.find(url).then(handle => ({ value: handle.doc() }), () => ({ unavailable: true })),
    sleep(3000).then(() => ({ unavailable: true, timeout: true })),
  ])
  finish(repo, found)
} else if (command === "try-edit") {
  // Changes the document and gives the node a second to take it.
  const [ws, url, key, value] = args
  const repo = repoAt(ws)
  const handle = await find(repo, url)
  handle.change(doc => {
    doc[key] = value
  })
  await sleep(1000)
  finish(repo, { heads: hexHeads(handle) })
} else if (command === "presence") {
  // Ephemeral messages: heard from another client of the document, never stored.
  const [ws, url, name] = args
  const repo = repoAt(ws)
  const handle = await find(repo, url)
  let heard = null
  handle.on("ephemeral-message", ({ senderId, message }) => {
    if (message && message.from !== name && !heard) heard = { heard: message, sender: senderId }
  })
  // Once heard, it goes on for 3 s more, so that the other client, which
  // may have connected later, hears it too.
  let left = Infinity
  for (let n = 0; left > 0; n++) {
    handle.broadcast({ from: name, n })
    if (heard && left === Infinity) left = 30
    left -= 1
    await sleep(100)
  }
  finish(repo, heard)
} else {
  console.error(`unknown command ${command}`)
  process.exit(64)
}
