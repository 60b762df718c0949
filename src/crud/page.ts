/** A page of a list: how many rows, after how many. (The HTTP query schema validates it.) */
export interface Page {
  limit: number;
  offset: number;
}

/** One page of rows and the total it was cut from. */
export interface PageOf<T> {
  data: T[];
  count: number;
}
