// The dashboard's JSON-RPC client over /ws, and helpers shared by the pages.
// Run content is attacker-controlled: it only ever reaches the page as text
// (textContent), never as HTML.
"use strict";

const Car = (() => {
  let socket = null;
  let nextId = 1;
  const pending = new Map();
  const eventHandlers = [];
  const openHandlers = [];

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws");
    socket.onopen = () => {
      showConnection("live", "live");
      openHandlers.forEach((handler) => handler());
    };
    socket.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      if (frame.method === "runs.trace.event") {
        eventHandlers.forEach((handler) => handler(frame.params));
        return;
      }
      const call = pending.get(frame.id);
      if (!call) return;
      pending.delete(frame.id);
      if (frame.error) call.reject(new Error(frame.error.message));
      else call.resolve(frame.result);
    };
    socket.onclose = () => {
      showConnection("disconnected: reconnecting", "down");
      pending.forEach((call) => call.reject(new Error("disconnected")));
      pending.clear();
      setTimeout(connect, 2000);
    };
  }

  function showConnection(text, state) {
    const element = document.getElementById("connection");
    element.textContent = text;
    element.dataset.state = state;
  }

  function call(method, params) {
    return new Promise((resolve, reject) => {
      if (!socket || socket.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      const id = nextId++;
      pending.set(id, { resolve, reject });
      socket.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  }

  // An element with text content only.
  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function time(stamp) {
    return stamp ? stamp.replace("T", " ").replace("Z", "") : "";
  }

  function duration(startedAt, endedAt) {
    if (!startedAt) return "";
    const end = endedAt ? Date.parse(endedAt) : Date.now();
    const seconds = Math.max(0, (end - Date.parse(startedAt)) / 1000);
    if (seconds < 60) return seconds.toFixed(1) + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
    return (seconds / 3600).toFixed(1) + " h";
  }

  return {
    start(onOpen, onEvent) {
      openHandlers.push(onOpen);
      if (onEvent) eventHandlers.push(onEvent);
      connect();
    },
    call,
    element,
    time,
    duration,
    statuses: ["in_progress", "completed", "incomplete", "cancelled"],
  };
})();
